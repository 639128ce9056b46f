"""The models: the registry of LAION heads, the download cache, head loading, Keras and torch weight conversion."""
