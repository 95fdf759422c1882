//! Reading a `docker save` tar stream.
