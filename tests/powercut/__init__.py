"""Power cuts in the booted SD card image: `python -m tests.powercut` (see rig.py)."""
