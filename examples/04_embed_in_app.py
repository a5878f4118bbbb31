"""A tiny app embedding the runtime: a local HTTP endpoint that streams generated text.

    python examples/04_embed_in_app.py bundles/tiny --port 8000
    curl -N -d '{"prompt": "def ", "max_new_tokens": 80}' http://127.0.0.1:8000/generate

Only the standard library and gptedge.runtime (numpy, onnxruntime, tokenizers): what an app on
an edge device ships. The response is chunked text/plain, one chunk per stable text piece. One
Generator serves all requests (its calls keep per-call state only, so threads may share it).
"""

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import gptedge.runtime as gptedge_runtime
from gptedge.runtime.errors import GptEdgeError


def make_handler(generator):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # chunked transfer encoding needs 1.1

        def do_POST(self):
            if self.path != "/generate":
                self.send_error(404, "POST /generate")
                return
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                stream = generator.stream(request["prompt"], max_new_tokens=int(request.get("max_new_tokens", 64)),
                                          temperature=float(request.get("temperature", 0.0)))
            except (ValueError, KeyError, TypeError, GptEdgeError) as exc:
                self.send_error(400, f"bad request: {exc}")
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for piece in stream:
                    data = piece.encode("utf-8")
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
            finally:
                stream.close()  # a client that hangs up stops the generation

        def log_message(self, format, *args):  # keep the console for the URL line
            pass

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="bundle folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    args = parser.parse_args()
    generator = gptedge_runtime.load(args.bundle)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(generator))
    print(f"listening on http://{args.host}:{server.server_address[1]}/generate", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        generator.close()
        sys.stdout.flush()


if __name__ == "__main__":
    main()
