"""Puts and gets blobs in an Azure Blob endpoint with Microsoft's own client, for the tests
(tests/src/azure.rs): the containers and blobs a test starts from, and the blobs it checks.

  azure-blob.py ENDPOINT ACCOUNT KEY create-container CONTAINER
  azure-blob.py ENDPOINT ACCOUNT KEY put CONTAINER BLOB FILE
  azure-blob.py ENDPOINT ACCOUNT KEY get CONTAINER BLOB      (the bytes on stdout)
"""
import sys

from azure.storage.blob import BlobServiceClient


def main(endpoint, account, key, command, *args):
    service = BlobServiceClient(
        account_url=endpoint, credential={"account_name": account, "account_key": key}
    )
    if command == "create-container":
        service.create_container(args[0])
    elif command == "put":
        container, blob, path = args
        with open(path, "rb") as f:
            service.get_blob_client(container, blob).upload_blob(f, overwrite=True)
    elif command == "get":
        container, blob = args
        sys.stdout.buffer.write(service.get_blob_client(container, blob).download_blob().readall())
    else:
        sys.exit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
