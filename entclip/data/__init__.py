"""Data and models: the built-in tasks and dataset adapters (tasks), the rewards, model loading
(models) and GGUF conversion (gguf). Imports the contracts and the pure math."""
