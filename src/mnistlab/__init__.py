"""mnistlab: handwritten-digit classification, end to end, as a tool."""

__version__ = "0.1.0"
