"""The GPU worker process: the loop that reads jobs, the handler that runs them on ``model/`` (torch), its caches,
model versions and switching, ``lisa-ls worker``/``up``/``promote``. Talks to Redis only through
:mod:`worker.client`."""
