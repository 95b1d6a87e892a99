"""Defaults of the model library that the command line needs without importing torch."""

#: LISA's ``evaluate`` default; released v1 answers ("Sure, [SEG].") need fewer than 10 tokens.
DEFAULT_MAX_NEW_TOKENS = 32

#: The environment variable naming the model (LISA release folder or Hub id) that ``lisa-ls worker``, ``up`` and
#: ``segment`` load when ``--model`` is not given. Deliberately not ``MODEL_DIR``: Label Studio's ML backends use
#: that for the backend's own data folder, and so does ours (``backend/config.py``); ``lisa-ls up`` hands its
#: backend and its workers one environment, so one name cannot mean both.
MODEL_ENV = "LISA_LS_MODEL"
