"""A current ClickHouse engine (chdb, 26.x, in process) behind ClickHouse's HTTP interface, for
the tests: the product's sink, deletions, retention runs and insights run against it unchanged, so
every statement of the Modern schema flavor runs on a current engine (the only server here is
18.16). It speaks the part of the HTTP protocol the Rust `clickhouse` crate uses:

- a query in the POST body (or `query=`), `database=`, `default_format=`, settings as parameters;
- inserts as `query=INSERT INTO t(c1,c2) FORMAT RowBinary` with the rows in the body, compressed
  in ClickHouse's LZ4 blocks when `decompress=1`. The body is written to a file, and read by the
  engine through its `file()` table function with the table's column types: the sink's own
  RowBinary bytes are what the engine decodes;
- errors as ClickHouse gives them: the exception text (`Code: N. DB::Exception: ...`), status 500.

One session, one query at a time (chdb is one engine in one process). Usage:
    python3 chdb_http.py PORT DATA_DIR
It prints `ready` when it listens.
"""

import os
import re
import sys
import tempfile
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import lz4.block
from chdb import session

# Parameters that are the protocol's, not settings.
PROTOCOL_PARAMETERS = {
    "query", "database", "default_format", "decompress", "compress", "user", "password",
    "query_id", "session_id", "role", "wait_end_of_query",
}
# Settings a statement may carry in its SETTINGS clause (others are the HTTP layer's concern).
QUERY_SETTINGS = {
    "insert_deduplication_token", "max_partitions_per_insert_block", "max_rows_to_read",
    "read_overflow_mode", "max_execution_time", "max_result_rows", "result_overflow_mode",
    "mutations_sync", "timeout_overflow_mode",
}
INSERT = re.compile(
    r"^\s*INSERT\s+INTO\s+(?P<table>[^\s(]+)\s*\((?P<columns>[^)]*)\)\s*FORMAT\s+RowBinary\s*$",
    re.IGNORECASE | re.DOTALL,
)
FORMAT_CLAUSE = re.compile(r"\bFORMAT\s+\w+\s*;?\s*$", re.IGNORECASE)

ENGINE_LOCK = threading.Lock()
ENGINE = None
SCRATCH = tempfile.mkdtemp(prefix="chdb-http-")


class EngineError(Exception):
    pass


LOG_STATEMENTS = bool(os.environ.get("CHDB_HTTP_LOG"))


def run(sql, output_format="TabSeparated"):
    if LOG_STATEMENTS:
        print(sql.replace("\n", " ")[:2000], file=sys.stderr, flush=True)
    with ENGINE_LOCK:
        try:
            return ENGINE.query(sql, output_format).bytes()
        except Exception as error:  # chdb raises ChdbError with ClickHouse's exception text
            raise EngineError(str(error)) from None


def quote_string(text):
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def settings_clause(parameters):
    settings = [
        f"{name} = {quote_string(value)}"
        for name, value in parameters.items()
        if name in QUERY_SETTINGS
    ]
    return " SETTINGS " + ", ".join(settings) if settings else ""


def unquote_identifier(name):
    name = name.strip()
    if len(name) >= 2 and name[0] == name[-1] and name[0] in "`\"":
        return name[1:-1]
    return name


def decompress_blocks(data):
    """ClickHouse's compressed blocks: a 16-byte checksum, then method (0x82: LZ4), the compressed
    size (with this 9-byte header) and the decompressed size, then the block."""
    out = bytearray()
    position = 0
    while position < len(data):
        header = data[position + 16 : position + 25]
        if len(header) < 9 or header[0] != 0x82:
            raise EngineError("Code: 271. DB::Exception: Data compressed with an unknown method. (CANNOT_DECOMPRESS)")
        compressed = int.from_bytes(header[1:5], "little")
        decompressed = int.from_bytes(header[5:9], "little")
        block = data[position + 25 : position + 16 + compressed]
        out += lz4.block.decompress(bytes(block), uncompressed_size=decompressed)
        position += 16 + compressed
    return bytes(out)


def insert_rows(match, body, database, parameters):
    table = unquote_identifier(match["table"])
    if "." in table:
        database, table = (unquote_identifier(part) for part in table.split(".", 1))
    columns = [unquote_identifier(column) for column in match["columns"].split(",")]
    described = run(
        f"SELECT name, type FROM system.columns WHERE database = {quote_string(database)} "
        f"AND table = {quote_string(table)} FORMAT TabSeparatedRaw"
    ).decode()
    types = dict(line.split("\t", 1) for line in described.splitlines() if line)
    if not types:
        raise EngineError(f"Code: 60. DB::Exception: Table {database}.{table} does not exist. (UNKNOWN_TABLE)")
    structure = ", ".join(f"`{column}` {types[column]}" for column in columns)
    with tempfile.NamedTemporaryFile(dir=SCRATCH, suffix=".rowbinary", delete=False) as rows:
        rows.write(body)
        path = rows.name
    column_list = ", ".join(f"`{column}`" for column in columns)
    run(
        f"INSERT INTO `{database}`.`{table}` ({column_list}){settings_clause(parameters)} "
        f"SELECT * FROM file({quote_string(path)}, 'RowBinary', {quote_string(structure)})"
    )


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *arguments):
        pass

    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(body)
                body += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def answer(self, status, body, exception_code=None):
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        if exception_code is not None:
            self.send_header("X-ClickHouse-Exception-Code", exception_code)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.startswith("/ping"):
            return self.answer(200, b"Ok.\n")
        self.handle_query(b"")

    def do_POST(self):
        self.handle_query(self.read_body())

    def handle_query(self, body):
        url = urllib.parse.urlsplit(self.path)
        parameters = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        database = parameters.get("database", "default")
        try:
            if "query" in parameters:
                sql = parameters["query"]
                data = body
            else:
                sql = body.decode()
                data = b""
            insert = INSERT.match(sql)
            if insert:
                if parameters.get("decompress") == "1":
                    data = decompress_blocks(data)
                insert_rows(insert, data, database, parameters)
                return self.answer(200, b"")
            output_format = parameters.get("default_format", "TabSeparated")
            found = FORMAT_CLAUSE.search(sql)
            if found:
                output_format = found.group(0).split()[1].rstrip(";")
                sql = sql[: found.start()]
            if re.match(r"^\s*(SELECT|WITH)\b", sql, re.IGNORECASE):
                sql = sql.rstrip().rstrip(";") + settings_clause(parameters)
            if database != "default":
                run(f"USE `{database}`")
            try:
                result = run(sql, output_format)
            finally:
                if database != "default":
                    run("USE default")
            return self.answer(200, result)
        except EngineError as error:
            text = str(error)
            code = re.search(r"Code: (\d+)", text)
            return self.answer(500, (text + "\n").encode(), code.group(1) if code else "1000")
        except Exception as error:  # a bug of this façade: say so as an error of the server
            return self.answer(500, f"Code: 1000. DB::Exception: chdb_http: {error!r}\n".encode(), "1000")


def main():
    global ENGINE
    port, data_dir = int(sys.argv[1]), sys.argv[2]
    ENGINE = session.Session(data_dir)
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
