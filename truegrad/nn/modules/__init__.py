"""Drop-in subclasses of ``torch.nn`` modules, grouped by layer family."""
