"""The Batch API: files and batches in Redis, run by rq jobs that feed the fleet at low priority."""
