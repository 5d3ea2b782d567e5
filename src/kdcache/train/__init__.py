"""Train students (and teachers) by streaming shards joined with cached teacher targets."""
