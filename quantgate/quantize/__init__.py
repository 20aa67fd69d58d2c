"""Quantization methods behind one narrow interface (base.Quantizer); the runner does the rest."""
