//! The result of one scenario: named figures, printed as one JSON line and
//! a readable table.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Figures of one scenario against one server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Figures {
    /// The scenario, e.g. `echo`.
    pub scenario: String,
    /// What was measured, e.g. `tidegate (receipt)` or a URL.
    pub server: String,
    /// The parameters, e.g. `connections=64 size=64 window=16`.
    pub parameters: String,
    /// Figure name (with its unit) to value.
    pub values: BTreeMap<String, f64>,
}

impl Figures {
    /// Start an empty set.
    pub fn new(scenario: &str, server: &str, parameters: String) -> Self {
        Self {
            scenario: scenario.to_owned(),
            server: server.to_owned(),
            parameters,
            values: BTreeMap::new(),
        }
    }

    /// Add a figure.
    pub fn set(&mut self, name: &str, value: f64) -> &mut Self {
        self.values.insert(name.to_owned(), value);
        self
    }

    /// A figure, if measured.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.values.get(name).copied()
    }

    /// Print the JSON line and the table.
    pub fn print(&self) {
        println!("{}", serde_json::to_string(self).unwrap_or_default());
        println!(
            "  {} against {} ({})",
            self.scenario, self.server, self.parameters
        );
        for (name, value) in &self.values {
            println!("    {name:<28} {value:>14.2}");
        }
    }
}
