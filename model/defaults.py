"""Defaults of the model library that the command line needs without importing torch."""

#: LISA's ``evaluate`` default; released v1 answers ("Sure, [SEG].") need fewer than 10 tokens.
DEFAULT_MAX_NEW_TOKENS = 32
