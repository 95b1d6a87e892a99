"""lisa-ls serving stack in two packages: :mod:`worker.client` (torch-free queue client: protocol, queue,
connection, settings - what the backend imports) and :mod:`worker.gpu` (the GPU process, which imports torch);
``worker/cli.py`` is the ``lisa-ls`` entry point, importing each side lazily."""
