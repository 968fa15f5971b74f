"""Validates objects against OpenAI's published OpenAPI document (its component schemas).

Usage: validator = load(path); validator.check("ResponseCompletedEvent", obj) raises with every
violation listed. Stream events are matched to their schema by their `type`.
"""

import yaml
import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012


class NoSpec:
    """Stands in when the document is absent: checks nothing, and the caller has said so."""

    def check(self, schema, obj):
        pass

    def check_event(self, event):
        return event.get("type")


def load(path):
    if not path:
        print("SKIPPED: no OpenAPI document given; events are not checked against the spec")
        return NoSpec()
    return Spec(path)


class Spec:
    def __init__(self, path):
        with open(path) as f:
            self.doc = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        resource = Resource(contents=self.doc, specification=DRAFT202012)
        self.registry = Registry().with_resource("urn:openai", resource)
        self.validators = {}
        self.event_schema = {}
        schemas = self.doc["components"]["schemas"]
        for ref in schemas["ResponseStreamEvent"]["anyOf"]:
            name = ref["$ref"].rsplit("/", 1)[1]
            kind = schemas[name].get("properties", {}).get("type", {}).get("enum", [None])[0]
            if kind:
                self.event_schema[kind] = name

    def errors(self, schema, obj):
        v = self.validators.get(schema)
        if v is None:
            v = jsonschema.Draft202012Validator(
                {"$ref": f"urn:openai#/components/schemas/{schema}"}, registry=self.registry
            )
            self.validators[schema] = v
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(obj)]

    def check(self, schema, obj):
        errs = self.errors(schema, obj)
        if errs:
            raise AssertionError(f"{schema} violates the spec: {errs[:5]}\n{obj}")

    def check_event(self, event):
        kind = event.get("type")
        schema = self.event_schema.get(kind)
        if schema is None:
            raise AssertionError(f"event type {kind!r} is not a published Responses stream event")
        self.check(schema, event)
        return schema
