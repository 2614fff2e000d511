"""Running a network over the workspace image cache: batched, flip-averaged feature extraction
(:mod:`.extract`, cached per checkpoint) and BatchNorm re-estimation on clean images
(:mod:`.batchnorm`). Clustering, training and evaluation all read features through here."""
