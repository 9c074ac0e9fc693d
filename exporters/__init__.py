"""Turn Hugging Face folders and GGUF files into portable_infer model packages."""
