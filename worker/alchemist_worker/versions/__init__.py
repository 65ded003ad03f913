"""Model versions: the atomic versions directory, artifact formats (PEFT adapter, safetensors) and publishing."""
