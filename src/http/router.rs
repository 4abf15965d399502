//! Path and method routing over matchit. The router is generic over what a route holds, so
//! the transport stays ignorant of handlers' signatures.

use http::Method;

/// Path parameters of a matched route (`{id}` → value).
#[derive(Debug, Clone, Default)]
pub struct Params(Vec<(String, String)>);

impl Params {
    /// The value of `{name}`, if the route has it.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// The outcome of routing one request.
pub enum Lookup<'a, H> {
    Found {
        route: &'a H,
        template: &'static str,
        params: Params,
    },
    /// The path exists with other methods; `allow` is the `Allow` header's value.
    MethodNotAllowed {
        template: &'static str,
        allow: String,
    },
    NotFound,
}

struct Path<H> {
    template: &'static str,
    methods: Vec<(Method, H)>,
}

/// A table of (method, path template) → route.
pub struct Router<H> {
    index: matchit::Router<usize>,
    paths: Vec<Path<H>>,
}

impl<H> Default for Router<H> {
    fn default() -> Self {
        Router { index: matchit::Router::new(), paths: Vec::new() }
    }
}

impl<H> Router<H> {
    /// Adds a route. A duplicate or conflicting template is a programming error, found at start.
    pub fn add(&mut self, method: Method, template: &'static str, route: H) {
        if let Some(p) = self.paths.iter_mut().find(|p| p.template == template) {
            assert!(
                !p.methods.iter().any(|(m, _)| *m == method),
                "duplicate route {method} {template}"
            );
            p.methods.push((method, route));
            return;
        }
        self.index
            .insert(template, self.paths.len())
            .unwrap_or_else(|e| panic!("route {template} conflicts: {e}"));
        self.paths.push(Path { template, methods: vec![(method, route)] });
    }

    /// Finds the route for a request.
    pub fn lookup(&self, method: &Method, path: &str) -> Lookup<'_, H> {
        let Ok(m) = self.index.at(path) else { return Lookup::NotFound };
        let entry = &self.paths[*m.value];
        match entry.methods.iter().find(|(mm, _)| mm == method) {
            Some((_, route)) => {
                let params = m.params.iter().map(|(k, v)| (k.to_string(), v.to_string()));
                Lookup::Found { route, template: entry.template, params: Params(params.collect()) }
            }
            None => {
                let allow: Vec<&str> = entry.methods.iter().map(|(m, _)| m.as_str()).collect();
                Lookup::MethodNotAllowed { template: entry.template, allow: allow.join(", ") }
            }
        }
    }

    /// Every (method, template, route), in the order they were added.
    pub fn routes(&self) -> impl Iterator<Item = (&Method, &'static str, &H)> {
        self.paths.iter().flat_map(|p| p.methods.iter().map(move |(m, h)| (m, p.template, h)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn found_not_found_and_method_not_allowed() {
        let mut r = Router::default();
        r.add(Method::GET, "/things/{id}", 1);
        r.add(Method::DELETE, "/things/{id}", 2);
        r.add(Method::GET, "/things", 3);
        match r.lookup(&Method::DELETE, "/things/42") {
            Lookup::Found { route, template, params } => {
                assert_eq!((*route, template, params.get("id")), (2, "/things/{id}", Some("42")));
            }
            _ => panic!("expected a match"),
        }
        match r.lookup(&Method::POST, "/things/42") {
            Lookup::MethodNotAllowed { allow, .. } => assert_eq!(allow, "GET, DELETE"),
            _ => panic!("expected 405"),
        }
        assert!(matches!(r.lookup(&Method::GET, "/nope"), Lookup::NotFound));
        assert_eq!(r.routes().count(), 3);
    }
}
