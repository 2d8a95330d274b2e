"""A local Google Cloud Storage server for the tests, and how to point
jaxcl's gs:// paths at it.

The server is gcp-storage-emulator (PyPI): it speaks GCS's JSON API over
HTTP on 127.0.0.1, and gcsfs (epath's gs://), google-cloud-storage,
tensorboardX, tensorstore (orbax's arrays) and google-cloud-cpp
(array_record's files: TFDS data sources) reach it through the environment
that `environment()` gives.

The emulator does not implement GCS's generation preconditions, which
jaxcl's workdir lock and tensorstore's OCDBT manifests rely on, so `python
tests/gcs_server.py PORT` starts it with GCS's documented rules added:
- an upload or delete whose ifGenerationMatch differs from the object's
  generation (0: the object must not exist) fails with 412;
- a download says the object's generation (x-goog-generation header), fails
  with 412 when ifGenerationMatch differs from it and answers 304 Not
  Modified when ifGenerationNotMatch equals it.
The emulator serves one request at a time, so a check and the write it
guards are one step, as on GCS. It also gains GCS's objects.move (moveTo),
which gcsfs uses for every rename.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from http import HTTPStatus

from gcp_storage_emulator import server, settings
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

BUCKET = 'jaxcl-test'


def environment(port: int) -> dict:
  """The variables that send every gs:// client of jaxcl to the server."""
  url = f'http://127.0.0.1:{port}'
  return {
      'STORAGE_EMULATOR_HOST': url,  # gcsfs, google-cloud-storage, tensorboardX
      'TENSORSTORE_GCS_HTTP_URL': url,  # orbax's arrays
      'CLOUD_STORAGE_EMULATOR_ENDPOINT': url,  # array_record's reader (TFDS data sources)
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test',  # tensorstore: no credential lookup
      # gcsfs asks a bucket's kind over gRPC, which the emulator lacks (a 60 s wait)
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
  }


def start(port: int, log_path) -> subprocess.Popen:
  """Starts the server on `port` with BUCKET created; waits until it answers.
  RuntimeError (with its log) if it does not start."""
  log = open(log_path, 'wb')
  process = subprocess.Popen([sys.executable, __file__, str(port)], stdout=log,
                             stderr=subprocess.STDOUT)
  deadline = time.time() + 60
  while time.time() < deadline:
    if process.poll() is not None:
      break
    try:
      with urllib.request.urlopen(f'http://127.0.0.1:{port}/storage/v1/b/{BUCKET}', timeout=2):
        return process
    except OSError:
      time.sleep(0.2)
  process.kill()
  log.close()
  with open(log_path, 'rb') as f:
    raise RuntimeError(f'the local GCS server did not start on port {port}: '
                       f'{f.read().decode(errors="replace")[-2000:]}')


# ------------------------------------------------------- the server itself ---
def _object_name(request) -> str | None:
  if request.params.get('object_id'):
    return request.params['object_id']
  if request.query.get('name'):
    return request.query['name'][0]
  data = request.data
  if isinstance(data, dict):  # multipart: the metadata part; resumable: the JSON body
    return (data.get('meta') or data).get('name')
  return None


def _generation(request, storage) -> str:
  """The named object's generation; '0' if there is none."""
  try:
    return str(storage.get_file_obj(request.params['bucket_name'],
                                    _object_name(request))['generation'])
  except NotFound:
    return '0'


def _precondition_failed(response) -> None:
  response.status = HTTPStatus.PRECONDITION_FAILED
  response.json({'error': {'code': 412, 'message': 'At least one of the pre-conditions you '
                           'specified did not hold.'}})


def _with_generation_match(handler):
  """An upload or delete `handler` behind GCS's ifGenerationMatch."""

  def checked(request, response, storage, *args, **kwargs):
    wanted = request.query.get('ifGenerationMatch')
    # (a resumable upload is checked when it starts)
    if wanted and 'upload_id' not in request.query and _generation(request, storage) != wanted[0]:
      return _precondition_failed(response)
    return handler(request, response, storage, *args, **kwargs)

  return checked


def _with_generation_read(download):
  """The download handler with GCS's generation header and read preconditions."""

  def checked(request, response, storage, *args, **kwargs):
    generation = _generation(request, storage)
    if generation != '0':
      match, not_match = (request.query.get(k) for k in ('ifGenerationMatch',
                                                         'ifGenerationNotMatch'))
      if match and match[0] != generation:
        return _precondition_failed(response)
      if not_match and not_match[0] == generation:
        response.status = HTTPStatus.NOT_MODIFIED
        response['x-goog-generation'] = generation
        return None
      response['x-goog-generation'] = generation
    return download(request, response, storage, *args, **kwargs)

  return checked


def _move(request, response, storage, *args, **kwargs):
  """POST b/BUCKET/o/OBJECT/moveTo/o/DEST (GCS's objects.move), which the
  emulator lacks: gcsfs tries it for every rename and, answered 501, retries
  with back-off for about 30 s before it copies and deletes instead."""
  del args, kwargs
  bucket, source, dest = (request.params[k] for k in ('bucket_name', 'object_id',
                                                       'dest_object_id'))
  try:
    moved = objects._copy(request.base_url, storage, bucket, source, bucket, dest)
  except NotFound:
    response.status = HTTPStatus.NOT_FOUND
    return
  objects._delete(storage, bucket, source)
  response.json(moved)


def _serve(port: int) -> None:
  checked = {fn: _with_generation_match(fn)
             for fn in (objects.insert, objects.delete, objects.upload_partial)}
  checked[objects.download] = _with_generation_read(objects.download)
  for fn in list(checked):  # the router calls objects.insert, get calls download, by name
    setattr(objects, fn.__name__, checked[fn])
  move = (rf'^{settings.API_ENDPOINT}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)'
          r'/moveTo/o/(?P<dest_object_id>.*[^/]+)$', {server.POST: _move})
  server.HANDLERS = (move,) + tuple(
      (pattern, {method: checked.get(fn, fn) for method, fn in methods.items()})
      for pattern, methods in server.HANDLERS)
  server.create_server('127.0.0.1', port, in_memory=True, default_bucket=BUCKET).run()


if __name__ == '__main__':
  os.environ.setdefault('PYTHONUNBUFFERED', '1')
  _serve(int(sys.argv[1]))
