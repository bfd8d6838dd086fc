__version__ = "0.1.0"

# vLLM releases this package is built and tested against.
SUPPORTED_VLLM = ("0.26.0", "0.33.0")
