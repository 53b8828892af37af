"""Teacher models; importing this package registers the built-in teacher kinds."""
from teachers import unisrec  # noqa: F401  (kind "unisrec")
from teachers import recformer  # noqa: F401  (kind "recformer")
from teachers import unim2rec  # noqa: F401  (kind "unim2rec")
from teachers import permuted  # noqa: F401  (kind "permuted": a corrupted copy of another kind)
