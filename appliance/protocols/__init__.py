"""Wire formats as pure code: parsing and framing, no sockets."""
