"""zotune inside other libraries' loops: the Hugging Face Trainer."""
