"""Engines behind one narrow streaming interface; see base.py. Chosen by name, loaded lazily."""
