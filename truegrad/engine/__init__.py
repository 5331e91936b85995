"""The engine: one place where every use of a parameter is followed back to the model's samples.

* :mod:`truegrad.engine.samples` - where the model's samples are in every tensor of a forward;
* :mod:`truegrad.engine.forward` - the model call (its batch, its inputs) and the tracking mode.

Every backend (``truegrad.nn`` modules, ``patch_torch``, ``patch_model``) is a door into it.
"""
