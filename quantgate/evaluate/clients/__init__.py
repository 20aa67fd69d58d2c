"""Load-test clients behind one narrow streaming interface (base.Client): over HTTP
(openai_http) or in process (transformers_local). Imported by module, so heavy ones load only
when chosen."""
