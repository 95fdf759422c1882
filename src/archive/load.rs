//! Writing a (thin) `docker load` tar stream.
