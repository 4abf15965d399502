//! The OpenAPI 3.1 document, built from the route table: every served route is documented
//! because documentation is part of adding a route.

use http::Method;
use serde_json::{json, Map, Value};
use utoipa::openapi::{RefOr, Schema};
use utoipa::ToSchema;

type Schemas = Vec<(String, RefOr<Schema>)>;
/// Registers a type's schema (and those it refers to) and returns its component name.
type SchemaFn = fn(&mut Schemas) -> String;

fn schema<T: ToSchema>(out: &mut Schemas) -> String {
    let name = T::name().to_string();
    if !out.iter().any(|(n, _)| *n == name) {
        out.push((name.clone(), T::schema()));
        T::schemas(out);
    }
    name
}

/// What a successful response carries.
#[derive(Clone, Copy)]
enum Content {
    Json(SchemaFn),
    JsonList(SchemaFn),
    Empty,
    Other(&'static str),
}

/// The documentation of one route.
#[derive(Clone)]
pub struct Doc {
    tag: &'static str,
    summary: &'static str,
    secured: bool,
    body: Option<SchemaFn>,
    form: bool,
    query: Vec<(&'static str, Value, &'static str)>,
    ok: (u16, Content),
    /// The success answer may also be an SSE stream (chat with `stream: true`).
    streams: bool,
    errors: Vec<u16>,
    /// Error statuses whose body is not the generic `HTTPError`.
    error_bodies: Vec<(u16, SchemaFn)>,
    /// Adds to the component schemas what utoipa cannot express (such as `contains`).
    refine: Option<fn(&mut Map<String, Value>)>,
}

impl Doc {
    /// A route in group `tag`, answering `200` with no body until told otherwise.
    pub fn new(tag: &'static str, summary: &'static str) -> Doc {
        Doc {
            tag,
            summary,
            secured: false,
            body: None,
            form: false,
            query: Vec::new(),
            ok: (200, Content::Empty),
            streams: false,
            errors: Vec::new(),
            error_bodies: Vec::new(),
            refine: None,
        }
    }

    /// Needs `Authorization: Bearer` (adds `401`).
    pub fn secured(mut self) -> Doc {
        self.secured = true;
        self.errors.push(401);
        self
    }

    /// Takes a JSON body of type `T` (adds `413`, `415` and `422`).
    pub fn body<T: ToSchema>(mut self) -> Doc {
        self.body = Some(schema::<T>);
        self.errors.extend([413, 415, 422]);
        self
    }

    /// Also accepts the body as an urlencoded form (OAuth2's password flow).
    pub fn form(mut self) -> Doc {
        self.form = true;
        self
    }

    /// Documents an optional query parameter: name, JSON schema, description.
    pub fn query(mut self, name: &'static str, schema: Value, about: &'static str) -> Doc {
        self.query.push((name, schema, about));
        self
    }

    /// A listing's `limit` and `cursor` query parameters; `cursor` matches `pattern`.
    pub fn paged(self, pattern: &'static str) -> Doc {
        let max = super::extract::MAX_PAGE;
        let limit = json!({"type": "integer", "minimum": 1, "maximum": max, "default": 20});
        self.query("limit", limit, "page size")
            .query(
                "cursor",
                json!({"type": "string", "pattern": pattern}),
                "next_cursor of the previous page",
            )
            .errors(&[422])
    }

    /// Answers `status` with a JSON `T`.
    pub fn json<T: ToSchema>(mut self, status: u16) -> Doc {
        self.ok = (status, Content::Json(schema::<T>));
        self
    }

    /// The success answer is `text/event-stream` when the request asks to stream.
    pub fn streams(mut self) -> Doc {
        self.streams = true;
        self
    }

    /// Answers `status` with a JSON array of `T`.
    pub fn json_list<T: ToSchema>(mut self, status: u16) -> Doc {
        self.ok = (status, Content::JsonList(schema::<T>));
        self
    }

    /// Answers `status` with an empty body.
    pub fn empty(mut self, status: u16) -> Doc {
        self.ok = (status, Content::Empty);
        self
    }

    /// Answers `200` with a non-JSON media type.
    pub fn media(mut self, content_type: &'static str) -> Doc {
        self.ok = (200, Content::Other(content_type));
        self
    }

    /// An error status whose body is a JSON `T` (such as `/ready`'s `503`).
    pub fn error_json<T: ToSchema>(mut self, status: u16) -> Doc {
        self.error_bodies.push((status, schema::<T>));
        self
    }

    /// Changes the component schemas once they are built, for rules utoipa cannot express.
    pub fn refine(mut self, f: fn(&mut Map<String, Value>)) -> Doc {
        self.refine = Some(f);
        self
    }

    /// Lists further error statuses.
    pub fn errors(mut self, statuses: &[u16]) -> Doc {
        self.errors.extend_from_slice(statuses);
        self
    }
}

/// The whole document for a route table.
pub fn document<'a>(routes: impl Iterator<Item = (&'a Method, &'static str, &'a Doc)>) -> Value {
    let mut schemas = Schemas::new();
    let mut paths = Map::new();
    let mut refinements = Vec::new();
    for (method, path, doc) in routes {
        refinements.extend(doc.refine);
        let op = operation(method, path, doc, &mut schemas);
        let entry = paths.entry(path).or_insert_with(|| json!({}));
        entry[method.as_str().to_ascii_lowercase()] = op;
    }
    let mut components: Map<String, Value> = schemas
        .into_iter()
        .map(|(name, s)| (name, serde_json::to_value(s).expect("schemas serialize")))
        .collect();
    components.extend(error_schemas());
    for refine in refinements {
        refine(&mut components);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "edgechat",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "A complete AI chat service in one binary. Authenticate with \
                `Authorization: Bearer <token>`, where the token is an access JWT from \
                `/auth/login` or an API key (`ec_…`) from `/auth/api-keys`.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": { "type": "http", "scheme": "bearer",
                            "description": "An access JWT or an API key (ec_…)" }
            }
        }
    })
}

fn operation(method: &Method, path: &str, doc: &Doc, schemas: &mut Schemas) -> Value {
    let id: String = format!("{}{}", method.as_str().to_ascii_lowercase(), path)
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let mut op = json!({
        "operationId": id.trim_end_matches('_'),
        "summary": doc.summary,
        "tags": [doc.tag],
        "responses": responses(doc, path.starts_with("/auth/"), super::Face::of(path), schemas),
    });
    let mut params: Vec<Value> = path
        .split('/')
        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }))
        .collect();
    params.extend(doc.query.iter().map(|(name, schema, about)| {
        json!({ "name": name, "in": "query", "required": false, "description": about, "schema": schema })
    }));
    if !params.is_empty() {
        op["parameters"] = Value::Array(params);
    }
    if let Some(body) = doc.body {
        let reference = reference(&body(schemas));
        let mut content = json!({ "application/json": { "schema": reference } });
        if doc.form {
            content["application/x-www-form-urlencoded"] = json!({ "schema": reference });
        }
        op["requestBody"] = json!({ "required": true, "content": content });
    }
    if doc.secured {
        op["security"] = json!([{ "bearer": [] }]);
    }
    op
}

/// `limited`: the route is under the per-address limit of `/auth/*`. Errors take the face's
/// shape: FastAPI's on the seed face, OpenAI's (with `400` for validation) on `/v1`.
fn responses(doc: &Doc, limited: bool, face: super::Face, schemas: &mut Schemas) -> Value {
    let (status, content) = doc.ok;
    let ok = match content {
        Content::Json(s) => json!({ "description": "Success",
            "content": { "application/json": { "schema": reference(&s(schemas)) } } }),
        Content::JsonList(s) => json!({ "description": "Success",
            "content": { "application/json": { "schema": { "type": "array", "items": reference(&s(schemas)) } } } }),
        Content::Empty => json!({ "description": "Success" }),
        Content::Other(media) => json!({ "description": "Success", "content": { media: {} } }),
    };
    let mut ok = ok;
    if doc.streams {
        // Each event: `data` holds one JSON chunk, and `[DONE]` last.
        let event = json!({ "type": "object", "required": ["data"],
            "properties": { "data": { "type": "string" }, "event": { "type": "string" } } });
        ok["content"]["text/event-stream"] = json!({ "schema": event });
    }
    let mut out = json!({ status.to_string(): ok });
    let mut errors = doc.errors.clone();
    errors.push(500);
    if limited {
        errors.push(429);
    }
    let openai = face == super::Face::OpenAi;
    if openai {
        errors.iter_mut().filter(|c| **c == 422).for_each(|c| *c = 400);
    }
    errors.sort_unstable();
    errors.dedup();
    for (code, body) in &doc.error_bodies {
        out[code.to_string()] = json!({ "description": "Failure",
            "content": { "application/json": { "schema": reference(&body(schemas)) } } });
    }
    for code in errors.into_iter().filter(|c| !doc.error_bodies.iter().any(|(e, _)| e == c)) {
        let (about, schema) = match code {
            400 => ("Invalid request", "HTTPError"),
            401 => ("Missing, invalid, expired or revoked credentials", "HTTPError"),
            403 => ("Refused by a rule the message names", "HTTPError"),
            404 => ("Not found, or not yours", "HTTPError"),
            409 => ("Already taken, or conflicts with the current state", "HTTPError"),
            413 => ("Request body over the size limit", "HTTPError"),
            415 => ("Wrong Content-Type", "HTTPError"),
            422 => ("Validation error", "HTTPValidationError"),
            429 => ("Rate limited; see Retry-After", "HTTPError"),
            502 => ("The provider failed and no fallback could answer", "HTTPError"),
            503 => ("Nothing can answer now (no provider for the model, or busy)", "HTTPError"),
            _ => ("Server error", "HTTPError"),
        };
        let schema = if openai { "OpenAIError" } else { schema };
        out[code.to_string()] = json!({ "description": about,
            "content": { "application/json": { "schema": reference(schema) } } });
    }
    out
}

fn reference(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn error_schemas() -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(
        "OpenAIError".into(),
        json!({
            "type": "object", "required": ["error"],
            "properties": { "error": {
                "type": "object", "required": ["message", "type"],
                "properties": {
                    "message": { "type": "string" },
                    "type": { "type": "string" },
                    "param": { "type": ["string", "null"] },
                    "code": { "type": ["string", "null"] }
                }
            } }
        }),
    );
    m.insert(
        "HTTPError".into(),
        json!({
            "type": "object", "required": ["detail"],
            "properties": { "detail": { "type": "string" } }
        }),
    );
    m.insert("ValidationError".into(), json!({
        "type": "object", "required": ["loc", "msg", "type"],
        "properties": {
            "loc": { "type": "array", "items": { "anyOf": [{ "type": "string" }, { "type": "integer" }] } },
            "msg": { "type": "string" },
            "type": { "type": "string" }
        }
    }));
    m.insert(
        "HTTPValidationError".into(),
        json!({
            "type": "object", "required": ["detail"],
            "properties": { "detail": { "type": "array", "items": reference("ValidationError") } }
        }),
    );
    m
}
