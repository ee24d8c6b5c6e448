"""The serving side: JSON/RLE encoding now; the HTTP app, batcher and runtimes come with the service issue."""
