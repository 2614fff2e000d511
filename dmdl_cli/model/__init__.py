"""The network: :mod:`.backbone` (ResNet AGW, GeM, BN neck), :mod:`.cai` (the CAI backdoor-adjusted
prediction), :mod:`.loading` (the one model loader) and :mod:`.weights` (where the ImageNet files
come from). Import from those modules: this package imports nothing, so that the torch-free
:mod:`.weights` (prepare-data's check of the recipe's ImageNet file) does not bring torch in.
"""
