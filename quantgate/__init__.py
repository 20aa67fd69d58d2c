"""quantgate: choose the quantized model, engine and budget for serving an LLM, behind gates.

The pipeline is recipe → quantize → evaluate → compare → track → manifest → gateway; see
ARCHITECTURE in the repository for the data flow. Importing the package loads nothing heavy.
"""

__version__ = "0.1.0"
