"""The PAct articulated objects: ``format`` (the on-disk format and its checks),
``synthetic`` (the generator and the cached data sets), ``encoder`` (stand-in image and
structure encoders), ``loader`` (dataset and collation for Stage1 and Stage2) and
``articulation`` (the 24-number articulation vectors)."""
