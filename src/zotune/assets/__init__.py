"""Models and data from the package registries: the cache and its checksums, the registry packages, GGUF conversion, model loading."""
