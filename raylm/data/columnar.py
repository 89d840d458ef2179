"""Documents from a text column of Parquet or Arrow IPC files, read a record batch at a time.

Arrow IPC comes in two layouts: the stream one (what Hugging Face
``save_to_disk`` writes as ``data-*.arrow``) and the file one (Feather v2);
both are tried.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pyarrow as pa

from raylm.errors import UserError, first_line

BATCH_ROWS = 1024


def _batches(path: Path, text_field: str):
    """(schema, record batches) of ``path``; the batches hold only the text column."""
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(path)
            schema = parquet.schema_arrow
            if text_field not in schema.names:
                return schema, iter(())
            return schema, parquet.iter_batches(batch_size=BATCH_ROWS, columns=[text_field])
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_stream(source)
            return reader.schema, iter(reader)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
            return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
    except (OSError, pa.ArrowException) as err:
        raise UserError(f"{path} is not a readable {path.suffix} file ({first_line(err)}); repair it or leave it out of data.source") from None


def columnar_documents(path: Path, text_field: str) -> Iterator[str]:
    """The strings of column ``text_field``, row by row; a null or a non-text column is a UserError naming the row."""
    schema, batches = _batches(path, text_field)
    if text_field not in schema.names:
        raise UserError(f"{path}: no column '{text_field}' (columns: {', '.join(schema.names) or 'none'}); set data.text_field to the column holding the text")
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise UserError(f"{path}: column '{text_field}' holds {column_type}, not strings; set data.text_field to the text column")
    row = 0
    try:
        for batch in batches:
            for text in batch.column(batch.schema.get_field_index(text_field)).to_pylist():
                if text is None:
                    raise UserError(f"{path}: row {row} of column '{text_field}' is null; fill or drop that row")
                row += 1
                yield text
    except (OSError, pa.ArrowException) as err:
        raise UserError(f"{path} is damaged after row {row} ({first_line(err)}); repair it or leave it out of data.source") from None
