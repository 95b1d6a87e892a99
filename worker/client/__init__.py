"""The queue client: the job protocol, its encodings, the Redis connection, the queue, its Lua scripts, the
settings, metrics and the model registry. Torch-free (the standard library, numpy, Pillow and redis): the backend
imports this package and nothing else of ``worker`` (``tests/test_layout.py`` checks it)."""
