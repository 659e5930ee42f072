"""lmslim: make transformer language models cheaper to train and run, and prove it with measurements."""

__version__ = "0.1.0"
