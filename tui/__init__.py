"""memtui's Textual front end. Imports no torch, transformers or NVML at import time."""
