"""Pseudo-labelling at scale: k-NN, sparse k-reciprocal Jaccard distance, DBSCAN, re-ranking.

- :mod:`dmdl_cli.clustering.neighbors` — ``knn(features, k, method="exact"|"ivf"|"hnsw")``:
  faiss-backed k nearest neighbours by inner product, the row itself always first.
- :mod:`dmdl_cli.clustering.jaccard` — ``jaccard_distance(features, k1=30, k2=6)``: the
  k-reciprocal Jaccard distance of the reference (ClusterContrast) algorithm, exact, as a sparse
  symmetric CSR matrix with O(N k) memory (explicit 0 diagonal; pairs not stored are at 1).
- :mod:`dmdl_cli.clustering.pseudo_labels` — ``cluster_features(features, eps=0.6,
  min_samples=4)``: DBSCAN pseudo labels (int64, -1 = outlier, renumbered in order of first
  appearance), ``cluster_stats`` diagnostics and ``centroids``.
- :mod:`dmdl_cli.clustering.rerank` — ``rerank_distance(q, g)``: k-reciprocal re-ranking
  (Zhong et al. 2017) of a query x gallery distance on the same sparse machinery.

Submodules are imported on demand (faiss and scikit-learn load only when used).
"""
