"""Data: the sample schema, shard writing and safe decoding, tokenisation, collation and DataModules."""
