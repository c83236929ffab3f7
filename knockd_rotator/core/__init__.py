"""What holds whatever enforces the doors: the generator, the settings, the plan
of every door at a moment, and the plumbing every part shares.  Nothing here
imports an engine (tests/test_layout.py)."""
