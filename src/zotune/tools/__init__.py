"""Tools around training: ``zotune bench`` (and its meters), ``zotune memory``, the demo."""
