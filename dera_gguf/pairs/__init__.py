"""Named pairs: models.toml (shipped and the user's), the user model folder, hub downloads, dera-pull.

:mod:`.registry` reads the pairs, :mod:`.entries` writes one into a models.toml, :mod:`.home` is
the user model folder, :mod:`.downloads` fetches single GGUF files through huggingface_hub,
:mod:`.pull` gets a pair's files and checks them.
"""
