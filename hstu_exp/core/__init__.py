"""The data structures every layer above shares and none of them owns: the jagged batch, the page
table that says where its keys live, and the page arithmetic of the KV pool. It imports nothing
from hstu_exp, so the kernels (`ops`), the model, the cache and the config can all use it without
importing each other (docs/design.md §8)."""
