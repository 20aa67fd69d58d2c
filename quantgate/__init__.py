"""quantgate: choose the quantized model, engine and budget for serving an LLM, behind gates.

The pipeline is recipe → quantize → evaluate → compare → track → manifest → gateway; see
docs/architecture.md for the data flow, the import rules and where to add things. Importing the package loads nothing heavy.
"""

__version__ = "0.1.0"
