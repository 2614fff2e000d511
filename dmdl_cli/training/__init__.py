"""Training: the loop both stages share (:mod:`.loop`, :mod:`.hooks`, :mod:`.state`), stage 1
(:mod:`.single`), stage 2 (:mod:`.cross`), their objectives, losses, cluster memories and CBT label
refinement. Import from those modules: this package imports nothing, so that the torch-free
:mod:`.logs` (``dmdl select`` reads the logs) does not bring torch in.
"""
