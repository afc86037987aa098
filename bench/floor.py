"""The floor for bench/run.py: a bare falcon app on waitress with the same
threads and route, parsing the same JSON and answering the same shape, with no
auth, storage or agent. Whatever aibutler costs on top shows against this."""

import sys

import falcon
import waitress


class Floor:
    def on_post(self, req, resp):
        body = req.get_media()
        resp.media = {"reply": "ok " + body["message"][:10], "session_id": "sess-floor",
                      "tool_calls": []}


def main(port, threads):
    app = falcon.App()
    app.add_route("/webhook/custom", Floor())
    server = waitress.create_server(app, host="127.0.0.1", port=port, threads=threads, ident="")
    print(f"listening on http://127.0.0.1:{server.effective_port}", flush=True)
    server.run()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
