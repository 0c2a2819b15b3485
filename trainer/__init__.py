"""The trainer: `python -m dlmctl.trainer` runs one resolved Run (one arm at one sweep point)."""
