"""Compare two gpu_check.py outputs: tokens, proofs and the row-invariance measurement must be identical."""
import sys

import numpy as np
import torch

old, new = (torch.load(p, weights_only=False) for p in sys.argv[1:3])
print("old", old["report"])
print("new", new["report"])
print("tokens identical:", old["tokens"] == new["tokens"], len(new["tokens"]), "groups",
      sum(len(c) for g in new["tokens"].values() for c in g), "tokens")
same = all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
           for ga, gb in zip(old["proofs"], new["proofs"]) for a, b in zip(ga, gb))
print("proofs identical:", same)
print("row invariance identical:", np.array_equal(old["exact"], new["exact"]))
