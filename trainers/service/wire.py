"""The protobuf messages of the Tinker wire, declared here with ``google.protobuf`` descriptors.

The official client posts ``ForwardBackwardRequest`` as protobuf and accepts
``ForwardBackwardOutput`` and ``SampleResponse`` only as protobuf. Only the field numbers and
types are the protocol; this module declares the subset the server reads and writes under its
own package name (no schema is taken from the client). Fields the server does not declare
(image chunks, provenance spans) are skipped by the parser; a chunk that carries no text is
then refused by the decoder.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

F = descriptor_pb2.FieldDescriptorProto
PACKAGE = "trillora.tinker_wire"

# (name, number, type, label, message type or enum, oneof index)
_MESSAGES: dict[str, list[tuple]] = {
    "SparseCsr": [("values", 1, F.TYPE_BYTES), ("crow_indices", 2, F.TYPE_BYTES), ("col_indices", 3, F.TYPE_BYTES)],
    "Tensor": [("dense", 1, F.TYPE_BYTES, None, None, 0), ("sparse_csr", 2, F.TYPE_MESSAGE, None, "SparseCsr", 0),
               ("dtype", 3, F.TYPE_ENUM, None, "DType"), ("shape", 4, F.TYPE_INT64, F.LABEL_REPEATED)],
    "EncodedTextChunk": [("tokens", 1, F.TYPE_BYTES)],
    "Chunk": [("encoded_text", 1, F.TYPE_MESSAGE, None, "EncodedTextChunk", 0)],
    "Datum": [("model_input", 1, F.TYPE_MESSAGE, F.LABEL_REPEATED, "Chunk"),
              ("loss_fn_inputs", 2, "map", None, ("string", "Tensor"))],
    "LossConfigValue": [("number", 1, F.TYPE_DOUBLE, None, None, 0), ("text", 2, F.TYPE_STRING, None, None, 0)],
    "ForwardBackwardRequest": [("model_id", 1, F.TYPE_STRING), ("seq_id", 2, F.TYPE_INT32),
                               ("data", 3, F.TYPE_MESSAGE, F.LABEL_REPEATED, "Datum"),
                               ("loss_fn", 4, F.TYPE_STRING), ("loss_fn_config", 5, "map", None, ("string", "double")),
                               ("forward_only", 6, F.TYPE_BOOL),
                               ("loss_fn_config_v2", 7, "map", None, ("string", "LossConfigValue"))],
    "BatchedTensor": [("data", 1, F.TYPE_BYTES), ("offsets", 2, F.TYPE_BYTES), ("dtype", 3, F.TYPE_ENUM, None, "DType"),
                      ("trailing_shape", 4, F.TYPE_INT64, F.LABEL_REPEATED)],
    "ArrayRecord": [("type_tag", 1, F.TYPE_STRING), ("fields", 2, "map", None, ("string", "BatchedTensor")),
                    ("num_datums", 3, F.TYPE_INT64)],
    "ForwardBackwardOutput": [("loss_fn_output_type", 1, F.TYPE_STRING),
                              ("loss_fn_outputs", 2, F.TYPE_MESSAGE, F.LABEL_REPEATED, "ArrayRecord"),
                              ("metrics", 3, "map", None, ("string", "double"))],
    "TopkLogprobs": [("token_ids", 1, F.TYPE_BYTES), ("logprobs", 2, F.TYPE_BYTES), ("k", 3, F.TYPE_UINT32),
                     ("length", 4, F.TYPE_UINT32)],
    "SampledSequence": [("stop_reason", 1, F.TYPE_ENUM, None, "StopReason"), ("tokens", 2, F.TYPE_BYTES),
                        ("logprobs", 3, F.TYPE_BYTES, None, None, "optional")],
    "SampleResponse": [("sequences", 1, F.TYPE_MESSAGE, F.LABEL_REPEATED, "SampledSequence"),
                       ("prompt_logprobs", 2, F.TYPE_BYTES, None, None, "optional"),
                       ("topk_prompt_logprobs", 3, F.TYPE_MESSAGE, None, "TopkLogprobs", "optional")],
}
_ONEOFS = {"Tensor": "encoding", "Chunk": "chunk", "LossConfigValue": "value"}
_ENUMS = {"DType": ["DTYPE_UNSPECIFIED", "DTYPE_FLOAT32", "DTYPE_INT64", "DTYPE_INT32", "DTYPE_BFLOAT16"],
          "StopReason": ["STOP_REASON_STOP", "STOP_REASON_LENGTH"]}
_SCALARS = {"string": F.TYPE_STRING, "double": F.TYPE_DOUBLE}


def _set_type(field: F, kind, type_name) -> None:
    if kind in ("string", "double"):
        field.type = _SCALARS[kind]
    elif kind == F.TYPE_ENUM or kind == F.TYPE_MESSAGE:
        field.type = kind
        field.type_name = f".{PACKAGE}.{type_name}"
    else:
        field.type = kind


def _add_field(message: descriptor_pb2.DescriptorProto, spec: tuple) -> None:
    name, number, kind, label, type_name, oneof = (tuple(spec) + (None,) * 6)[:6]
    field = message.field.add(name=name, number=number, label=label or F.LABEL_OPTIONAL)
    if kind == "map":  # a repeated nested *Entry message with key and value
        entry = message.nested_type.add(name="".join(p.title() for p in name.split("_")) + "Entry")
        entry.options.map_entry = True
        for i, part in enumerate(("key", "value")):
            sub = entry.field.add(name=part, number=i + 1, label=F.LABEL_OPTIONAL)
            _set_type(sub, type_name[i] if type_name[i] in _SCALARS else F.TYPE_MESSAGE, type_name[i])
        field.label, field.type = F.LABEL_REPEATED, F.TYPE_MESSAGE
        field.type_name = f".{PACKAGE}.{message.name}.{entry.name}"
        return
    _set_type(field, kind, type_name)
    if oneof == "optional":  # proto3 `optional`: a synthetic one-field oneof
        field.proto3_optional = True
        field.oneof_index = len(message.oneof_decl)
        message.oneof_decl.add(name=f"_{name}")
    elif oneof is not None:
        field.oneof_index = oneof


def _build() -> dict[str, type]:
    file = descriptor_pb2.FileDescriptorProto(name="trillora_tinker_wire.proto", package=PACKAGE, syntax="proto3")
    for enum_name, values in _ENUMS.items():
        enum = file.enum_type.add(name=enum_name)
        for number, value in enumerate(values):
            enum.value.add(name=value, number=number)
    for name, fields in _MESSAGES.items():
        message = file.message_type.add(name=name)
        if name in _ONEOFS:
            message.oneof_decl.add(name=_ONEOFS[name])
        for spec in fields:
            _add_field(message, spec)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
            for name in _MESSAGES}


MESSAGES = _build()
ForwardBackwardRequest = MESSAGES["ForwardBackwardRequest"]
ForwardBackwardOutput = MESSAGES["ForwardBackwardOutput"]
SampleResponse = MESSAGES["SampleResponse"]
DTYPE_FLOAT32, DTYPE_INT64, DTYPE_INT32 = 1, 2, 3
STOP_REASONS = {"stop": 0, "length": 1}
