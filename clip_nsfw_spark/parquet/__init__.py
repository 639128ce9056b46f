"""Parquet at page level: the Thrift compact codec, the embedding page decoder, the spliced writer."""
