"""lisa-ls serving stack: the job protocol, the Redis queue and the worker loop (none of it imports torch)."""
